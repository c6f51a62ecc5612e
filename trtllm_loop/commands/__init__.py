"""One module per ``trtllm-loop`` subcommand; see ``trtllm_loop/cli.py``."""
