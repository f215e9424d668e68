"""Code generated from proto/ by `make gen` (grpcio-tools); never edited by hand."""
