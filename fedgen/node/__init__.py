"""Site node and aggregator deployment: configs, keys, health checks, `fedgen node`/`aggregator` commands.

A hospital runs a **site node** (Flower SuperNode + fedgen's ClientApp) next to its genotype
data; the study runs one **aggregator** (Flower SuperLink + fedgen's ServerApp). Both talk
over TLS (the study's own CA) and every site node authenticates with its own ECDSA key,
registered at the aggregator. ``nodes/`` in the source tree holds what hospital IT deploys
(templates, the PKI script, systemd units, a compose file and the runbook).
"""
