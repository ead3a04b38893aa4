import sys

from trajlab.cli import main

sys.exit(main())
