"""Triton Python-backend models; `trtllm-loop triton-repo` copies each one to `<model>/1/model.py`."""
