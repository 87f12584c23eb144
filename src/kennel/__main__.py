import sys

from kennel.serve.cli import main

sys.exit(main())
