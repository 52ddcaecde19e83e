import os
import sys

# Tests import networks/ and para_trainer/ from this checkout, installed or not; nothing is downloaded.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# OpenMP threads that spin while waiting make a tiny model 100x slower as soon as a second process (the
# 2-process trainer test) shares the 2 cores; waiting threads that sleep cost nothing here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
