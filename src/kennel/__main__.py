import sys

from kennel.cli.main import main

sys.exit(main())
