# Appends its arguments (one JSON list per line) to $FAKE_MPREMOTE_LOG; with $FAKE_MPREMOTE_FAIL set,
# prints that text on stderr the way mpremote does and exits 1.
import json
import os
import sys

with open(os.environ["FAKE_MPREMOTE_LOG"], "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\n")
failure = os.environ.get("FAKE_MPREMOTE_FAIL")
if failure is not None:
    sys.stderr.write(failure)
    sys.exit(1)
print("cp /stage/lib/app.py :lib/app.py")
