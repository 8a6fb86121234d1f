"""Model-based test of batches (hypothesis): random batches, plain writes, rollbacks,
reloads, GCs and snapshots over four store kinds, against dicts."""

from __future__ import annotations

import shutil
import tempfile
from typing import Any

import construct
import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import l2_stores
from l2_stores import (
    Retain,
    make_indexable,
    make_indexable_removable,
    make_indexed_file,
    make_singleton,
)

Levels = make_indexable("levels", construct.Int16ub, construct.Bytes(4))
Messages = make_indexable_removable("messages", construct.Int16ub, construct.Bytes(2))
Blocks = make_indexed_file("blocks", construct.Int16ub, construct.GreedyBytes, construct.Int8ub)
Head = make_singleton("head", construct.Int16ub)

keys = st.integers(0, 40)
writes = st.lists(
    st.one_of(
        st.tuples(st.just("levels"), keys, st.binary(min_size=4, max_size=4)),
        st.tuples(st.just("messages"), keys, st.binary(min_size=2, max_size=2)),
        st.tuples(st.just("remove"), keys, st.none()),
        st.tuples(st.just("blocks"), keys, st.binary(max_size=600)),
        st.tuples(st.just("head"), keys, st.none()),
        st.tuples(st.just("delete"), keys, st.none()),
    ),
    min_size=1,
    max_size=8,
)


class Batches(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="l2-batch-model-")
        self.model: dict[str, Any] = {"levels": {}, "messages": {}, "blocks": {}, "head": None}
        self.stores: tuple[Any, ...] = ()
        self.load()

    def load(self) -> None:
        base = self.directory
        self.stores = (
            Levels.load(f"{base}/levels", index_buffer_size=4),
            Messages.load(f"{base}/messages", index_buffer_size=4),
            Blocks.load(f"{base}/blocks", index_buffer_size=4),
            Head.load(f"{base}/head", fsync=False),
        )

    def apply(self, model: dict[str, Any], views: tuple[Any, ...], ops: list[Any]) -> None:
        levels, messages, blocks, head = views
        for kind, key, value in ops:
            if kind == "levels":
                levels.add(key, value)
                model["levels"][key] = value
            elif kind == "messages":
                messages.add(key, value)
                model["messages"][key] = value
            elif kind == "remove":
                messages.remove(key)
                model["messages"].pop(key, None)
            elif kind == "blocks":
                blocks.append(key, value, len(value) % 256)
                model["blocks"][key] = (value, len(value) % 256)
            elif kind == "head":
                head.write(key)
                model["head"] = key
            else:
                head.delete()
                model["head"] = None

    @rule(ops=writes, commit=st.booleans())
    def batch(self, ops: list[Any], commit: bool) -> None:
        staged = {
            name: dict(value) if isinstance(value, dict) else value
            for name, value in self.model.items()
        }
        batch = l2_stores.batch(*self.stores)
        self.apply(staged, batch.views, ops)
        levels_b, messages_b, blocks_b, head_b = batch.views
        assert dict(levels_b.items()) == staged["levels"]
        assert dict(messages_b.items()) == staged["messages"]
        assert len(blocks_b) == len(staged["blocks"]) and head_b.read() == staged["head"]
        if commit:
            batch.commit()
            self.model = staged
        else:
            batch.rollback()

    @rule(ops=writes)
    def plain(self, ops: list[Any]) -> None:
        self.apply(self.model, self.stores, ops)

    @rule()
    def reload(self) -> None:
        for store in self.stores:
            store.close()
        self.load()

    @precondition(lambda self: bool(self.model["levels"]) or bool(self.model["blocks"]))
    @rule(data=st.data())
    def gc(self, data: st.DataObject) -> None:
        levels, _, blocks, _ = self.stores
        kept = data.draw(st.lists(st.sampled_from([*self.model["levels"], 0]), max_size=5))
        levels.gc(Retain(kept), background=False)
        self.model["levels"] = {k: v for k, v in self.model["levels"].items() if k in kept}
        kept = data.draw(st.lists(st.sampled_from([*self.model["blocks"], 0]), max_size=5))
        blocks.gc(Retain(kept), background=False)
        self.model["blocks"] = {k: v for k, v in self.model["blocks"].items() if k in kept}

    @invariant()
    def matches(self) -> None:
        levels, messages, _, head = self.stores
        with l2_stores.snapshot(*self.stores) as (levels_s, messages_s, blocks_s, head_s):
            assert dict(levels_s.items()) == self.model["levels"] == dict(levels.items())
            assert dict(messages_s.items()) == self.model["messages"]
            assert dict(blocks_s.items()) == self.model["blocks"]
            assert head_s.read() == self.model["head"] == head.read()
            assert len(messages_s) == len(self.model["messages"]) == len(messages)

    def teardown(self) -> None:
        for store in self.stores:
            store.close()
        shutil.rmtree(self.directory, ignore_errors=True)


Batches.TestCase.settings = settings(max_examples=30, stateful_step_count=25)
TestBatches = Batches.TestCase
