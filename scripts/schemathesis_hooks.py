"""Schemathesis hooks for scripts/schemathesis.sh (loaded through SCHEMATHESIS_HOOKS)."""

import schemathesis


@schemathesis.hook
def before_call(context, case, kwargs):
    # A campaign rate limit makes a batch's messages wait their turn (1/min: a minute per
    # message), and `wait_for_receipts` holds the answer until the last one is done; correct,
    # but not something to wait for in a bounded run. Generated batches that wait keep no rate.
    body = case.body
    if isinstance(body, dict) and body.get("wait_for_receipts") is True:
        if body.get("campaign_rate_per_minute"):
            body["campaign_rate_per_minute"] = 0
