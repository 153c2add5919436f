"""The pool family: pools, their volumes, and every operation on them."""
