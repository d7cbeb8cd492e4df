import os
import sys
from pathlib import Path

# Tests import the helpers in tests/ (launch.py) and the repo's package without an install.
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
