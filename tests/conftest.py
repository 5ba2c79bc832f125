import os
import sys

# Spawned ranks import helpers and test modules by name: make the tests folder importable.
sys.path.insert(0, os.path.dirname(__file__))
