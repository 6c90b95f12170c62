"""Getting a spec onto a cluster: job submission, the job entrypoint, KubeRay/AWS manifests (render) and
the resource fit of a plan to a cluster (fit)."""
