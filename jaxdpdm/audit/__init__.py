"""jaxdpdm.audit: empirical privacy auditing of a DP training run with canaries.

* `canaries`: canary design, secret inclusion bits, injection into the real mechanism.
* `report`: epsilon lower bounds (jax-privacy's CanaryScoreAuditor) and the audit report.
* `run`: `--mode=audit`, the canary-audited run in `<workdir>/audit`.
"""
