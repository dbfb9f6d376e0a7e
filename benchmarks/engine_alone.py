"""Section 3: `Authorizer.decide` in this process, without gRPC, for growing policy sets.

The 100 workloads are namespaces `ns-0`..`ns-9` times labels `app=app-0`..`app-9`, and
every workload has one RequestAuthentication. The target workload `ns-0`/`app=app-0` always
has the same two AuthorizationPolicies (a DENY on `/admin/*` that does not match and the
scenario's ALLOW that does), and the remaining policies are spread over the other 99
workloads. So only the count of policies that do not apply to the target grows.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass, field
from typing import Any

from benchmarks.context import BenchContext, Section
from benchmarks.loadgen import BenchmarkError
from benchmarks.measure import Summary, paired_ratios
from benchmarks.report import table
from benchmarks.scenario import AUDIENCE, GROUP, ISSUER, METHOD, check_request
from extauthz.engine import WORKLOAD_CACHE_SIZE, Authorizer, PolicySnapshot
from extauthz.jwks import JwksCache
from extauthz.policy import compile_policy_files
from extauthz.policy.model import PolicySet
from extauthz.request import RequestContext, Workload
from extauthz.servicer import CheckSettings, request_from_check
from tests.support.keys import jwks_document, sign_token, standard_claims

ROOT_NAMESPACE = "istio-system"
NAMESPACES = 10
APPS = 10
TARGET = Workload.of("ns-0", {"app": "app-0"})
POLICY_COUNTS = (10, 100, 1000)
RULE_COUNTS = (1, 5)
APPLICABLE_COUNTS = (1, 10, 100)  # ALLOW policies of the target, out of APPLICABLE_TOTAL
APPLICABLE_TOTAL = 1000
CALIBRATION_DECISIONS = 200
SELECTION_REPEATS = 20

TITLE = "3. Engine alone"


def _workloads() -> list[Workload]:
    return [Workload.of(f"ns-{n}", {"app": f"app-{a}"}) for n in range(NAMESPACES) for a in range(APPS)]


def _metadata(name: str, workload: Workload) -> dict[str, Any]:
    return {"name": name, "namespace": workload.namespace}


def _selector(workload: Workload) -> dict[str, Any]:
    return {"matchLabels": workload.label_dict()}


def _request_authentication(workload: Workload, issuers: list[str], jwks_text: str) -> dict[str, Any]:
    rules = [{"issuer": issuer, "audiences": [AUDIENCE], "jwks": jwks_text} for issuer in issuers]
    return {"apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
            "metadata": _metadata(f"jwt-{workload.label_dict()['app']}", workload),
            "spec": {"selector": _selector(workload), "jwtRules": rules}}


def _allow(name: str, workload: Workload, path_prefix: str, group: str) -> dict[str, Any]:
    """An ALLOW policy of the scenario's shape: principal, method, path and a groups claim."""
    rule = {
        "from": [{"source": {"requestPrincipals": [f"{ISSUER}/*"]}}],
        "to": [{"operation": {"methods": [METHOD], "paths": [f"{path_prefix}/*"]}}],
        "when": [{"key": "request.auth.claims[groups]", "values": [group]}],
    }
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": _metadata(name, workload),
            "spec": {"selector": _selector(workload), "action": "ALLOW", "rules": [rule]}}


def _deny_admin(workload: Workload) -> dict[str, Any]:
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": _metadata("deny-admin", workload),
            "spec": {"selector": _selector(workload), "action": "DENY",
                     "rules": [{"to": [{"operation": {"paths": ["/admin/*"]}}]}]}}


def build_policy_set(jwks_text: str, *, policies: int, rules: int, applicable_allow: int = 1) -> PolicySet:
    """Compile `policies` AuthorizationPolicies of which 1 DENY and `applicable_allow` ALLOW apply to TARGET.

    The target's RequestAuthentication has `rules` jwtRules, and the token's issuer is the
    last one, so every other rule is passed over before the one that verifies.
    """
    workloads = _workloads()
    others = [w for w in workloads if w != TARGET]
    decoy_issuers = [f"https://issuer-{index}.bench.local" for index in range(1, rules)]
    documents: list[dict[str, Any]] = [_request_authentication(TARGET, [*decoy_issuers, ISSUER], jwks_text)]
    documents += [_request_authentication(w, [ISSUER], jwks_text) for w in others]
    documents.append(_deny_admin(TARGET))
    # Only the last applicable ALLOW policy matches, so each one before it is evaluated.
    for index in range(applicable_allow - 1):
        documents.append(_allow(f"other-path-{index}", TARGET, f"/other-{index}", GROUP))
    documents.append(_allow("api-readers", TARGET, "/api", GROUP))
    for index in range(policies - 1 - applicable_allow):
        workload = others[index % len(others)]
        documents.append(_allow(f"policy-{index}", workload, f"/svc-{index}", f"group-{index % 7}"))
    text = "\n---\n".join(json.dumps(document) for document in documents)
    return compile_policy_files([("policies.yaml", text.encode())])


def _context(token: str) -> RequestContext:
    return request_from_check(check_request(token), CheckSettings())


@dataclass
class Config:
    """One policy set and how its decisions are timed. `samples` contains µs per decision of each round."""

    label: str
    policy_set: PolicySet
    cold: bool
    samples: list[float] = field(default_factory=list)
    decisions: int = 0


def _authorizer(policy_set: PolicySet) -> Authorizer:
    jwks = JwksCache()
    jwks.update(policy_set.inline_jwks, policy_set.remote_jwks)
    return Authorizer(jwks, PolicySnapshot(policy_set, ROOT_NAMESPACE))


def _fresh_snapshot(authorizer: Authorizer, policy_set: PolicySet) -> None:
    """Install a new snapshot, whose token cache is empty, with the target's policies already selected."""
    snapshot = PolicySnapshot(policy_set, ROOT_NAMESPACE)
    snapshot.for_workload(TARGET)
    authorizer.snapshot = snapshot


def _time_decisions(authorizer: Authorizer, contexts: list[RequestContext], count: int) -> float:
    """Return µs per decision over `count` decisions that cycle through `contexts`.

    Raises BenchmarkError when any decision denies the request.
    """
    decide = authorizer.decide
    allowed = 0
    size = len(contexts)
    started = time.perf_counter_ns()
    for index in range(count):
        allowed += decide(contexts[index % size], TARGET).allowed
    elapsed_ns = time.perf_counter_ns() - started
    if allowed != count:
        raise BenchmarkError(f"engine benchmark: {count - allowed} of {count} decisions denied the scenario request")
    return elapsed_ns / count / 1000


def _time_selection(policy_set: PolicySet) -> float:
    """Return µs to select the target's policies in a new snapshot: the first Check of a workload per revision."""
    started = time.perf_counter_ns()
    for _ in range(SELECTION_REPEATS):
        PolicySnapshot(policy_set, ROOT_NAMESPACE).for_workload(TARGET)
    return (time.perf_counter_ns() - started) / SELECTION_REPEATS / 1000


def run(ctx: BenchContext) -> Section:
    profile = ctx.profile
    ctx.commands.note("no command: the decisions run in the benchmark process (--sections 3 runs them alone)")
    key = ctx.scenario.signing_key
    jwks_text = json.dumps(jwks_document(key))
    warm_context = _context(ctx.scenario.token)
    # Each cold decision needs a token that the snapshot has not verified yet.
    cold_contexts = [_context(sign_token(key, standard_claims(ISSUER, audiences=(AUDIENCE,), ttl_s=7200,
                                                              groups=[GROUP], jti=f"cold-{index}")))
                     for index in range(profile.engine_cold_decisions)]

    policy_sets = {(policies, rules): build_policy_set(jwks_text, policies=policies, rules=rules)
                   for policies in POLICY_COUNTS for rules in RULE_COUNTS}
    applicable_sets = {count: build_policy_set(jwks_text, policies=APPLICABLE_TOTAL, rules=1,
                                               applicable_allow=count) for count in APPLICABLE_COUNTS}
    configs: dict[tuple[Any, ...], Config] = {}
    for (policies, rules), policy_set in policy_sets.items():
        for cold in (False, True):
            configs[("size", policies, rules, cold)] = Config(f"{policies}/{rules}", policy_set, cold)
    for count, policy_set in applicable_sets.items():
        configs[("applicable", count)] = Config(str(count), policy_set, cold=False)
    selection: dict[int, list[float]] = {policies: [] for policies in POLICY_COUNTS}
    authorizers = {id(config): _authorizer(config.policy_set) for config in configs.values()}

    for config in configs.values():
        authorizer = authorizers[id(config)]
        if config.cold:
            config.decisions = len(cold_contexts)
            continue
        per_decision_us = _time_decisions(authorizer, [warm_context], CALIBRATION_DECISIONS)
        config.decisions = max(CALIBRATION_DECISIONS, int(profile.engine_round_s * 1e6 / per_decision_us))

    def measure(config: Config) -> float:
        authorizer = authorizers[id(config)]
        if config.cold:
            _fresh_snapshot(authorizer, config.policy_set)
            return _time_decisions(authorizer, cold_contexts, config.decisions)
        return _time_decisions(authorizer, [warm_context], config.decisions)

    for _ in range(profile.rounds):
        for config in configs.values():
            gc.collect()  # so that garbage of the previous config is not collected inside this one
            config.samples.append(measure(config))
        for policies in POLICY_COUNTS:
            selection[policies].append(_time_selection(policy_sets[(policies, 1)]))
    return Section(TITLE, _render(ctx, configs, selection), [])


def _render(ctx: BenchContext, configs: dict[tuple[Any, ...], Config], selection: dict[int, list[float]]) -> str:
    rows = []
    for policies in POLICY_COUNTS:
        row = [f"{policies:,}", f"{policies - 2:,}"]
        for rules in RULE_COUNTS:
            for cold in (False, True):
                row.append(Summary.of(configs[("size", policies, rules, cold)].samples).format(1))
        row.append(Summary.of(selection[policies]).format(1))
        rows.append(row)

    def samples(policies: int, rules: int, cold: bool) -> list[float]:
        return configs[("size", policies, rules, cold)].samples

    growth_warm = paired_ratios(samples(POLICY_COUNTS[-1], 1, False), samples(POLICY_COUNTS[0], 1, False))
    growth_cold = paired_ratios(samples(POLICY_COUNTS[-1], 1, True), samples(POLICY_COUNTS[0], 1, True))
    applicable_rows = [[str(count), Summary.of(configs[("applicable", count)].samples).format(1)]
                       for count in APPLICABLE_COUNTS]
    warm_decisions = configs[("size", POLICY_COUNTS[0], 1, False)].decisions
    return "\n".join([
        f"`extauthz.engine.Authorizer.decide(RequestContext, Workload)` in the benchmark process, pinned to CPU "
        f"{ctx.cpus.client}, while no server of this benchmark runs. Policies come from `compile_policy_files` "
        "and keys from `JwksCache.update` with inline `jwks`, so no HTTP is involved. The `RequestContext` is "
        "built from the scenario's CheckRequest by the servicer's `request_from_check`, outside the timed loop.",
        "",
        "- **warm**: the same token in every decision, so after the first one the signature check is "
        "served from the snapshot's verified-token cache. Each policy set's loop is sized to take about "
        f"{ctx.profile.engine_round_s} s ({warm_decisions:,} decisions with 10 policies and 1 rule).",
        f"- **cold**: {ctx.profile.engine_cold_decisions:,} distinct tokens (same claims, different `jti`), each "
        "decided once in a fresh `PolicySnapshot` whose target-workload selection was made before the timing. "
        "Every decision verifies an RS256 (2048-bit) signature. A fresh snapshot per decision would also "
        "time the policy selection, which happens once per workload and policy revision and is shown "
        "separately in the last column.",
        "- **5 rules**: the target's RequestAuthentication has 5 jwtRules with different issuers, and the "
        "token's issuer is the last.",
        "",
        "µs per decision, median (min–max) of the rounds:",
        "",
        table(["AuthorizationPolicies", "not applicable to the target", "1 rule, warm", "1 rule, cold",
               "5 rules, warm", "5 rules, cold", "policy selection, first Check of a workload"], rows),
        "",
        f"- 1,000 over 10 policies, same 2 applicable (paired rounds): warm **{growth_warm.format(2)}×**, cold "
        f"**{growth_cold.format(2)}×**. A decision scans only the policies selected for its workload, "
        "which are cached per policy revision.",
        "- The selection itself scans every policy once per workload and revision, so it grows with the total "
        f"count. The workload cache keeps up to {WORKLOAD_CACHE_SIZE:,} workloads.",
        "",
        f"Growing **applicable** policies instead, out of {APPLICABLE_TOTAL:,} in total, where only the last "
        "ALLOW policy matches (warm, 1 rule):",
        "",
        table(["applicable ALLOW policies", "µs per decision"], applicable_rows),
    ])
