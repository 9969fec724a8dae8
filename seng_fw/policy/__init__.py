"""Per-application policy: who may run an app (attested identity, client hosts) and the
enclave subnet its addresses come from. The policy compiler extends these models with
egress/ingress rules; admission uses only the identity and placement fields."""
