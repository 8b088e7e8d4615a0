"""Launchers: submit `pagoda run` to a Ray cluster, a Slurm allocation or Kubernetes (KubeRay), and bring up a
multi-node Ray cluster on one machine. Each module imports Ray, YAML schemas etc. only when used."""
