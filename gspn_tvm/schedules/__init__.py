"""One schedule per target: how the compute of ``gspn_tvm.compute`` runs on that target."""
