"""What the command lines (python -m fastkd.train, python -m fastkd.study) share: one-line errors, and telling the
flags given from the defaults."""
import argparse


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr, `<name>: error: <message>`, exit 2, no usage dump."""

    def __init__(self, name: str, **kwargs):
        super().__init__(prog=f"python -m {name}", formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kwargs)
        self.name = name

    def error(self, message):
        self.exit(2, f"{self.name}: error: {message}\n")

    def given(self, argv) -> dict:
        """Only the options given in `argv`, by their dest: argparse fills a default only into a namespace that lacks
        the attribute, so every dest is pre-set to None and what stays None was not given."""
        unset = argparse.Namespace(**{dest: None for dest in vars(self.parse_args([]))})
        return {k: v for k, v in vars(self.parse_args(argv, namespace=unset)).items() if v is not None}
