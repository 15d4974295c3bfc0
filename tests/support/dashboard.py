"""Where the toy Gated DeltaNet's demo SAE reads: the hook and head the dashboard tests check against."""

HOOK, HEAD = "blocks.1.mixer.hook_state", 0
