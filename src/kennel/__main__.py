import sys

from kennel.cli import main

sys.exit(main())
