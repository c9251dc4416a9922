"""`baton soak`: a bounded soak of a local cluster. Minutes of mixed HTTP load with random client
cancellations and worker restarts (kill -9, then the same command again); every request is classified
(completed, cancelled by the client, failed with a clear error, or lost), and at the end nothing may
be lost and no block may be left held anywhere.

`workload` makes the requests, `client` sends one and records what came back, `outcome` classifies
that, `run` drives the cluster and `report` tallies it."""
