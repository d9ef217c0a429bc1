"""Peak anonymous resident memory of this process (Linux ``RssAnon``), sampled every few milliseconds.

RssAnon is what the process really holds: memory-mapped file pages (safetensors tensors) are page cache and appear
under RssFile instead. Used by the ComfyUI benchmark and the in-process ComfyUI checks of the tests.
"""

from __future__ import annotations

import threading
import time


class AnonPeak:
    def __enter__(self):
        self.base = self.peak = self.now()
        self.stop = False
        self.t = threading.Thread(target=self.loop, daemon=True)
        self.t.start()
        return self

    @staticmethod
    def now():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
        return 0

    def loop(self):
        while not self.stop:
            self.peak = max(self.peak, self.now())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.stop = True
        self.t.join()
        self.peak = max(self.peak, self.now())
        self.growth = self.peak - self.base
