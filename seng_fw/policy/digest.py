"""The digest of a policy: what `seng-fw apply` stamps on the ruleset it loads and hands
to the gateway with the policy's path, so that the gateway admits by the very policy
the ruleset was compiled from (it refuses a file whose digest differs), and `status`
can tell when the two disagree."""

from __future__ import annotations

import hashlib
import json

from seng_fw.policy.models import Policy


def policy_digest(policy: Policy) -> str:
    """SHA-256 of the parsed policy: the same for the same rules, whatever the comments."""

    def plain(value: object) -> str:
        return value.hex() if isinstance(value, bytes) else str(value)

    dump = policy.model_dump(mode="python")
    text = json.dumps(dump, sort_keys=True, default=plain)
    return hashlib.sha256(text.encode()).hexdigest()
