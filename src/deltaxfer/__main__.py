import sys

from deltaxfer.cli import main

sys.exit(main())
