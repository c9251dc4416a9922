"""Stop strings, applied to streamed text at the edge: text is released only once it can no longer be
the start of a stop string, so a stop string never reaches the client (unless asked for)."""

from __future__ import annotations


class StopStringMatcher:
    def __init__(self, stops: list[str], include_in_output: bool = False) -> None:
        self.stops = stops
        self.include_in_output = include_in_output
        self.matched: str | None = None
        """The stop string found, once one was."""
        self._held = ""

    def push(self, text: str) -> str:
        """Add streamed text; return what may be released now. After a match, the text up to the
        stop string (included if asked for) is released and the rest is dropped."""
        if not self.stops:
            return text
        if self.matched is not None:
            return ""
        buffer = self._held + text
        found = [(i, s) for s in self.stops if (i := buffer.find(s)) != -1]
        if found:
            start, stop = min(found)
            self.matched, self._held = stop, ""
            return buffer[: start + len(stop)] if self.include_in_output else buffer[:start]
        keep = self._partial_stop_length(buffer)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        """At the end of the stream: release what was held back as a possible stop string's start."""
        held, self._held = self._held, ""
        return held

    def _partial_stop_length(self, buffer: str) -> int:
        """Length of the longest end of `buffer` that some stop string starts with."""
        longest = min(max(len(s) for s in self.stops) - 1, len(buffer))
        for k in range(longest, 0, -1):
            tail = buffer[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0
