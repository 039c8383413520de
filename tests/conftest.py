import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
# The tests use tiny tensors: intra-op threads only add overhead, and on a loaded 2-core machine
# they make small ops orders of magnitude slower. Spawned ranks set one thread too (helpers.py).
torch.set_num_threads(1)
