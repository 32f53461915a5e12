"""Turn the raw results into figures, one markdown table per scenario, and files.

A figure is one labelled number per target; the table puts the targets side by side
and, for every numeric figure, the ratio of each Sisyphus target to Nchan (and of
Sisyphus on Redis to Nchan on Redis).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

Figures = list[tuple[str, Any]]
REFERENCE = "nchan"
REDIS_REFERENCE = "nchan-redis"
SATURATED_PCT = 90.0


def _verdict(step: dict[str, Any]) -> str:
    if step["pass"]:
        return "pass"
    return "sustained" if step["sustained"] else "FAIL"


def s1_figures(data: dict[str, Any]) -> Figures:
    out: Figures = []
    for row in data["rows"]:
        at = f"S1 {row['size']:,} streams"
        out += [
            (f"{at}: held", row["alive"]),
            (f"{at}: RSS per stream (KiB)", row["rss_per_conn_kib"]),
            (f"{at}: RSS total (MiB)", row["rss_kib"] / 1024),
            (f"{at}: idle server CPU (%)", row["server_cpu_pct"]),
            (f"{at}: connect rate (streams/s)", row["connect_rate"]),
        ]
        if "redis_pubsub_conns" in row:
            out.append((f"{at}: Redis pub/sub conns", row["redis_pubsub_conns"]))
    return out


def ladder_figures(prefix: str, data: dict[str, Any]) -> Figures:
    out: Figures = []
    for step in data["steps"]:
        at = f"{prefix} @ {step['rate']:g} msg/s"
        out += [
            (f"{at}: deliveries/s", step["deliveries_per_s"]),
            (f"{at}: loss", step["missing"]),
            (f"{at}: p50 (ms)", step["p50_ms"]),
            (f"{at}: p99 (ms)", step["p99_ms"]),
            (f"{at}: verdict", _verdict(step)),
            (f"{at}: server CPU (%)", step["server_cpu_pct"]),
            (f"{at}: load CPU (%)", step["load_cpu_pct"]),
        ]
        if "redis_cpu_pct" in step:
            out.append((f"{at}: Redis CPU (%)", step["redis_cpu_pct"]))
            out.append((f"{at}: Redis pub/sub conns", step.get("redis_pubsub_conns")))
    out += [
        (f"{prefix}: highest passing rate (msg/s)", data["highest_pass"]),
        (f"{prefix}: highest sustained rate (msg/s)", data["highest_sustained"]),
    ]
    return out


def s4_figures(data: dict[str, Any]) -> Figures:
    out: Figures = [
        ("S4 churn: cycles/s", data["cycles_per_s"]),
        ("S4 churn: errors", sum(data["errors"].values())),
        ("S4 churn: connect-to-ready p50 (ms)", data["handshake_p50_ms"]),
        ("S4 churn: connect-to-ready p99 (ms)", data["handshake_p99_ms"]),
        ("S4 churn: server CPU (%)", data["server_cpu_pct"]),
        ("S4 churn: load CPU (%)", data["load_cpu_pct"]),
    ]
    if "redis_cpu_pct" in data:
        out.append(("S4 churn: Redis CPU (%)", data["redis_cpu_pct"]))
        out.append(("S4 churn: Redis pub/sub conns", data.get("redis_pubsub_conns")))
    if "c_client_cycles_per_s" in data:
        out.append(("S4 churn, C client: cycles/s", data["c_client_cycles_per_s"]))
        out.append(("S4 churn, C client: server CPU (%)", data["c_client_server_cpu_pct"]))
        if "c_client_redis_cpu_pct" in data:
            out.append(("S4 churn, C client: Redis CPU (%)", data["c_client_redis_cpu_pct"]))
    return out


def figures(scenario: str, data: dict[str, Any]) -> Figures:
    if "error" in data:
        return [(f"{scenario}: error", data["error"])]
    if scenario == "S1":
        return s1_figures(data)
    if scenario == "S2":
        out: Figures = []
        for count, run in data.items():
            out += ladder_figures(f"S2 {int(count):,} subs", run)
        return out
    if scenario == "S3":
        return ladder_figures(f"S3 {data['subscribers']:,} users", data)
    if scenario == "S5":
        return ladder_figures(f"S5 {data['subscribers']:,} users on user:<id>", data)
    return s4_figures(data)


def fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)


def ratio(value: Any, reference: Any) -> str:
    numeric = (int, float)
    if isinstance(value, bool) or isinstance(reference, bool):
        return ""
    if not isinstance(value, numeric) or not isinstance(reference, numeric) or reference == 0:
        return ""
    return f"{value / reference:.2f}"


def ratio_pairs(targets: list[str]) -> list[tuple[str, str]]:
    """Each Sisyphus target against Nchan, Sisyphus on Redis against Nchan on Redis, and
    two workers against one."""
    pairs = [(t, REFERENCE) for t in targets if t.startswith("sisyphus") and REFERENCE in targets]
    if "sisyphus-redis" in targets and REDIS_REFERENCE in targets:
        pairs.append(("sisyphus-redis", REDIS_REFERENCE))
    if "sisyphus-redis" in targets and "sisyphus-redis-w2" in targets:
        pairs.append(("sisyphus-redis-w2", "sisyphus-redis"))
    return pairs


def table(scenario: str, per_target: dict[str, Figures], targets: list[str]) -> str:
    labels: list[str] = []
    values: dict[str, dict[str, Any]] = {}
    for target in targets:
        after = -1  # a new label goes right after this target's previous one
        for label, value in per_target.get(target, []):
            if label not in values:
                labels.insert(after + 1, label)
                values[label] = {}
            after = labels.index(label)
            values[label][target] = value
    pairs = ratio_pairs(targets)
    head = ["figure", *targets, *(f"{t}/{r}" for t, r in pairs)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label in labels:
        row = values[label]
        cells = [label, *(fmt(row.get(t)) for t in targets)]
        cells += [ratio(row.get(t), row.get(r)) for t, r in pairs]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pubsub_counts(data: Any) -> list[int]:
    """Every Redis pub/sub connection count recorded anywhere in a result."""
    found: list[int] = []
    if isinstance(data, dict):
        for key, value in data.items():
            if key == "redis_pubsub_conns" and isinstance(value, int):
                found.append(value)
            else:
                found += pubsub_counts(value)
    elif isinstance(data, list):
        for item in data:
            found += pubsub_counts(item)
    return found


def notes(results: dict[str, dict[str, Any]]) -> list[str]:
    """Warnings worth reading before the numbers."""
    out: list[str] = []
    for scenario, per_target in results.items():
        for target, data in per_target.items():
            if "error" in data:
                out.append(f"{scenario} {target}: ERROR {data['error']}")
                continue
            counts = pubsub_counts(data)
            # One per process; on the three-primary cluster, one per primary.
            expected = 2 if target.endswith("-w2") else 3 if target.endswith("-cluster") else 1
            if any(c != expected for c in counts):
                out.append(
                    f"{scenario} {target}: Redis pub/sub connections seen {sorted(set(counts))}, "
                    f"expected always {expected}"
                )
            ladders = []
            if scenario == "S2":
                ladders = list(data.values())
            elif scenario in ("S3", "S5"):
                ladders = [data]
            for run in ladders:
                if run["open_errors"]:
                    out.append(f"{scenario} {target}: could not open {run['open_errors']}")
                for step in run["steps"]:
                    if step["load_saturated"]:
                        out.append(
                            f"{scenario} {target} @ {step['rate']:g}/s: load core at "
                            f"{step['load_cpu_pct']:.0f} %: the client may be the bottleneck"
                        )
                    if step["extra"] or step["redis_zero_receivers"] or step["publish_failed"]:
                        out.append(
                            f"{scenario} {target} @ {step['rate']:g}/s: "
                            f"{step['publish_failed']} publishes failed or unanswered "
                            f"(then delivered anyway: {step['extra']} deliveries beyond the "
                            f"acknowledged ones), {step['redis_zero_receivers']} PUBLISH "
                            "reached no subscriber"
                        )
            if scenario == "S1":
                for row in data["rows"]:
                    if row["alive"] < row["size"]:
                        out.append(
                            f"S1 {target}: holds {row['alive']:,} of {row['size']:,} "
                            f"streams ({row['errors']})"
                        )
            if scenario == "S4" and data["errors"]:
                out.append(f"S4 {target}: errors {data['errors']}")
            if scenario == "S4" and data["load_cpu_pct"] >= SATURATED_PCT:
                out.append(
                    f"S4 {target}: load core at {data['load_cpu_pct']:.0f} %: the client may "
                    f"limit the cycle rate (server at {data['server_cpu_pct']:.0f} %)"
                )
    return out


def markdown(meta: dict[str, Any], results: dict[str, dict[str, Any]], targets: list[str]) -> str:
    parts = [f"# Sisyphus benchmark, {meta['started']}", ""]
    parts += [f"- {line}" for line in meta["describe"]]
    for scenario, per_target in results.items():
        figs = {t: figures(scenario, d) for t, d in per_target.items()}
        parts += ["", f"## {scenario}", "", table(scenario, figs, targets)]
    warnings = notes(results)
    if warnings:
        parts += ["", "## Notes", ""] + [f"- {w}" for w in warnings]
    return "\n".join(parts) + "\n"


def write(
    folder: Path, meta: dict[str, Any], results: dict[str, dict[str, Any]], targets: list[str]
) -> tuple[Path, Path, str]:
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    text = markdown(meta, results, targets)
    flat = {
        scenario: {t: dict(figures(scenario, d)) for t, d in per_target.items()}
        for scenario, per_target in results.items()
    }
    json_path = folder / f"bench-{stamp}.json"
    md_path = folder / f"bench-{stamp}.md"
    payload = {"meta": meta, "results": results, "figures": flat}
    json_path.write_text(json.dumps(payload, indent=1, default=str))
    md_path.write_text(text)
    return json_path, md_path, text
