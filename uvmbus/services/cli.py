"""`uvmbus` command line (placeholder until the CLI lands)."""


def main() -> int:
    print("uvmbus: CLI not built yet")
    return 1
