"""One module per op: launcher and dispatch (`<op>.py`), Triton kernels (`<op>_triton.py`), C++ in csrc/<op>.cpp."""
