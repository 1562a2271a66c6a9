"""A small progress bar on stderr: redrawn in place on a terminal, one line per epoch record elsewhere."""
import sys
import time


class Progress:
    def __init__(self, total: int, stream=sys.stderr, min_interval: float = 0.25):
        self.total, self.stream, self.min_interval = total, stream, min_interval
        self.start = time.perf_counter()
        self._last_draw = 0.0
        self.tty = stream.isatty()

    def update(self, done: int, text: str = "") -> None:
        now = time.perf_counter()
        if not self.tty or (now - self._last_draw < self.min_interval and done < self.total):
            return
        self._last_draw = now
        self.stream.write("\r" + self._line(done, text))
        self.stream.flush()

    def note(self, done: int, text: str) -> None:
        """A line that stays (an epoch record)."""
        if self.tty:
            self.stream.write("\r\033[K")
        self.stream.write(self._line(done, text) + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def _line(self, done: int, text: str) -> str:
        width = 30
        filled = int(width * done / max(1, self.total))
        elapsed = time.perf_counter() - self.start
        eta = elapsed / done * (self.total - done) if done else 0.0
        return (f"[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} steps "
                f"{elapsed:5.0f}s eta {eta:4.0f}s {text}")
