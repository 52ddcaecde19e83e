import os
import sys

# Tests import networks/ and para_trainer/ from this checkout, installed or not; nothing is downloaded.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# OMP_WAIT_POLICY stays at OpenMP's default here: PASSIVE (threads that sleep at once when they wait) made
# single-process training 2.4x slower (the toy-sd1 quick-start test: 288 s against 122 s, 2026-12-07). Only tests
# that run several processes on the same cores set it for those processes (test_train.py).
