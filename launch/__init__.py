"""Launch scripts: `python -m launch.tpu` (gcloud wrapper) and `launch/host.sh` (the idempotent host script)."""
