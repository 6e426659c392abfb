import sys

from workers.tools.cli import main

sys.exit(main())
