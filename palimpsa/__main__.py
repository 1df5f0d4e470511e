import sys

from palimpsa.cli import main

sys.exit(main())
