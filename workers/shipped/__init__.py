"""The files sensorpipe ships with, read through importlib.resources (``workers.core.paths``).

In a checkout these are links to the files at the top of the tree, where the design keeps them (the
supervisord template, ``deploy/``, ``firmware/``); a wheel carries copies of them.
"""
