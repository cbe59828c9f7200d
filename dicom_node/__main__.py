"""``python -m dicom_node``: the same command line as the ``dicom-node`` script."""

import sys

from .watch.cli import main

sys.exit(main())
