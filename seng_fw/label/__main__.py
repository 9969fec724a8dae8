import sys

from seng_fw.label.service import main

sys.exit(main())
