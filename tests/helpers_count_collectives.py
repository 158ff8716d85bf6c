"""Run under torchrun: train a recipe through the engine while counting the collectives
(torch.distributed.all_reduce calls) made inside the training epoch; rank 0 prints them."""
import json
import sys
import traceback

import torch.distributed as dist

from powergrad.config.loading import load_recipe
from powergrad.system.preemption import StopRequest
from powergrad.training import engine

in_epoch = []
real_all_reduce = dist.all_reduce


def counting_all_reduce(*args, **kwargs):
    in_epoch.append(any(f.name == "train_one_epoch" for f in traceback.extract_stack()))
    return real_all_reduce(*args, **kwargs)


dist.all_reduce = counting_all_reduce
with StopRequest() as stop:  # as `powergrad train` runs it: the stop checks are counted too
    summary = engine.train(load_recipe(sys.argv[1], sys.argv[2:]), stop=stop)
if dist.get_rank() == 0:
    print("collectives " + json.dumps({"in_epoch": sum(in_epoch), "updates": summary["updates"]}),
          flush=True)
dist.destroy_process_group()
