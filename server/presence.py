"""Presence fan-out inside one worker: who here subscribes to whom, and the pushes.

Subscriptions belong to connections (a client subscribes to the users whose
chats it shows) and live only in the memory of the worker holding the
connection; they end with it.  The presence itself is in LMDB
(server/social.py), so every worker can read it.

When a user's presence, privacy, blocks or contacts change on this worker,
the user is noted; at the end of the loop tick the worker tells every other
worker (one small ``pres`` node per user, batched per peer into the tick's
one write) and re-evaluates its own subscribers.  A worker receiving such a
note re-reads the user's state from the store and pushes to its subscribers
whose view changed.  Reading the state instead of carrying it makes the
order of notes irrelevant: whatever arrives last, every subscriber ends with
the current state, and each gets a push only when what it may see changed.

Each distinct view (at most three: the full one, online hidden, everything
hidden) is encoded once per change and the same bytes go to every
subscriber that sees it.
"""

from __future__ import annotations

from pigeon.core.errors import ErrorCode
from pigeon.core.events import Error


class PresenceHub:
    def __init__(self, worker, social, encoder):
        self.worker = worker
        self.social = social
        self.encoder = encoder
        self.limit = worker.config.presence_subscriptions
        #: target user -> {session: the view last pushed to it (None: none yet)}
        self.subs: dict[str, dict] = {}
        self.changed: set[str] = set()  # changed on this worker: tell the others
        self.remote: set[str] = set()  # changed on another worker

    # -- subscriptions ----------------------------------------------------------

    def subscribe(self, s, target: str) -> None:
        """Subscribe session ``s`` to ``target``; it gets the current state at once."""
        if s.subs is None:
            s.subs = set()
        if target not in s.subs:
            if len(s.subs) >= self.limit:
                s.send(Error(ErrorCode.TOO_MANY,
                             f"at most {self.limit} presence subscriptions per connection"))  # fmt: skip
                return
            s.subs.add(target)
            self.subs.setdefault(target, {})[s] = None
        view = self.social.views(target, (s.user,))[s.user]
        self.subs[target][s] = view
        self._push(s, self.encoder.presence(target, *view))

    def unsubscribe(self, s, target: str) -> None:
        if s.subs and target in s.subs:
            s.subs.discard(target)
            self._forget(s, target)

    def drop(self, s) -> None:
        """The connection is gone: its subscriptions end."""
        for target in s.subs or ():
            self._forget(s, target)
        s.subs = None

    def _forget(self, s, target: str) -> None:
        subs = self.subs.get(target)
        if subs is not None:
            subs.pop(s, None)
            if not subs:
                del self.subs[target]

    # -- changes --------------------------------------------------------------------

    def note(self, user: str) -> None:
        """``user``'s presence (or who may see it) changed here."""
        self.changed.add(user)
        self.worker.stats.counters["presence_changes"] += 1
        self.worker._schedule_tick()

    def note_remote(self, user: str) -> None:
        self.remote.add(user)
        self.worker._schedule_tick()

    def flush(self) -> None:
        """End of the tick: tell the other workers, then update our own subscribers."""
        if not self.changed and not self.remote:
            return
        changed, self.changed = self.changed, set()
        remote, self.remote = self.remote, set()
        if changed:
            bus = self.worker.bus
            peers = [p for p in bus.peer_ids() if p != self.worker.wid]
            for user in changed:
                for p in peers:
                    bus.presence(p, user)
        for user in changed | remote:
            self.apply(user)

    def apply(self, user: str) -> None:
        subs = self.subs.get(user)
        if not subs:
            return
        views = self.social.views(user, {s.user for s in subs})
        frames = {}
        for s, sent in subs.items():
            view = views[s.user]
            if view == sent or s.paused:
                continue  # a paused session is brought up to date when it resumes
            frame = frames.get(view)
            if frame is None:
                frame = frames[view] = self.encoder.presence(user, *view)
            subs[s] = view
            self._push(s, frame)

    def refresh(self, s) -> None:
        """A paused session resumed: push what changed meanwhile."""
        for target in s.subs or ():
            subs = self.subs.get(target)
            if subs is None:
                continue
            view = self.social.views(target, (s.user,))[s.user]
            if view != subs.get(s):
                subs[s] = view
                self._push(s, self.encoder.presence(target, *view))

    def _push(self, s, frame: bytes) -> None:
        if s.closing or s.device is None:
            return
        s.push(frame)
        self.worker.stats.counters["presence_pushes"] += 1
