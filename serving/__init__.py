"""The Ray Serve application: ingress (FastAPI), routes per task family, model deployments, build_app()."""
