"""The model layer: base model folders, the task model around them, the AdapterSpec they imply, the PEFT folder of a
result. Used by everyone who needs a spec or a model (the device, the server, the exporter, Flower, the
simulation); it needs torch and transformers (the `client` or `server` extra), never a side's package.

  folders.py      a model folder: its check, type, default LoRA targets, matches_target, model_hash
  bundled.py      the bundled base models, where they are installed, default_model_dir; cli.py = `hetlora model`
  pooling.py      classification pooling recorded in the spec (native | mean)
  task_model.py   load_task_model, dense_parameter_names, load_tokenizer
  adapter_spec.py derive_spec (the meta device: shapes, no weights)
  peft_folder.py  a PEFT folder AutoPeftModelFor... loads alone; save_result = a run's result

Nothing is downloaded: every load is `local_files_only`, and the Hugging Face libraries are told so here,
before any module of this package imports them.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
