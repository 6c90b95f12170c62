"""Store outages waited out by a pool's input tasks reach the stage's recoveries record.

An actor's report rows carry the outages its process waited out (:func:`ray_jobs.runtime.item_reports.report_row`),
but the input tasks that read and decode the items before the actors (``run_pool``'s ``prepare``) make no
report rows: an outage they rode out was told in their log and then lost. Here the input step adds what it
waited out to its batch, and the actor, wrapped, moves it into its own first report row, where the driver
counts it with the rest. Both wrappers keep the wrapped function's or class's name (Ray Data names its
operators and actors after them).
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import pandas as pd

from diclip import storage

CARRIED = ("input_store_outages", "input_store_wait_s")


def carrying_prepare(prepare: Callable) -> Callable:
    """``prepare`` that also puts this process's outages since its last batch on the batch's first row."""

    @functools.wraps(prepare)
    def call(batch: pd.DataFrame, **kwargs) -> pd.DataFrame:
        out = prepare(batch, **kwargs)
        outages, waited = storage.take_outages()
        if len(out):
            out = out.assign(**{CARRIED[0]: 0, CARRIED[1]: 0.0})
            out.iloc[0, out.columns.get_loc(CARRIED[0])] = outages
            out.iloc[0, out.columns.get_loc(CARRIED[1])] = waited
        return out

    return call


def move_into_report(batch: pd.DataFrame, report: pd.DataFrame) -> pd.DataFrame:
    """Add the input step's carried outages (dropped from ``batch``'s columns) to ``report``'s first row."""
    if CARRIED[0] not in batch or not len(report):
        return report
    outages = int(batch[CARRIED[0]].fillna(0).sum())
    waited = float(batch[CARRIED[1]].fillna(0).sum())
    if not outages:
        return report
    report = report.copy()
    for column, value, zero in (("store_outages", outages, 0), ("store_wait_s", waited, 0.0)):
        if column not in report:
            report[column] = zero
        report[column] = report[column].fillna(zero)
        report.iloc[0, report.columns.get_loc(column)] += value
    return report


def carrying_actor(actor_cls: type) -> type:
    """A subclass of ``actor_cls`` whose ``__call__`` hands the input step's outages on in its report."""

    class Carrying(actor_cls):  # type: ignore[misc, valid-type]
        def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
            inner = batch.drop(columns=[c for c in CARRIED if c in batch])
            return move_into_report(batch, super().__call__(inner))

    Carrying.__name__, Carrying.__qualname__ = actor_cls.__name__, actor_cls.__qualname__
    Carrying.__doc__ = actor_cls.__doc__
    return Carrying
