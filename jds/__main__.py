import sys

from jds.cli import main

sys.exit(main())
