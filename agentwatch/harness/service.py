"""The LLM gateway as a service of a Monitor (run/services.py): the daemon
(`agentwatch daemon start --gateway CONFIG`) starts one, and every run of
that daemon gets it.

For each run: the agent's environment points the OpenAI and Anthropic
clients at the gateway (OPENAI_BASE_URL, ANTHROPIC_BASE_URL) with a dummy
per-run key (the real key stays in agentwatch); the run's weight becomes its
inference share in the scheduler (as it is its cgroup's CPU weight); its
budgets (--budget-tokens, --budget-requests, --budget-cost) become its
ledger; its --prompt file is what each request's system prompt must be.
Callers are named by the kernel (core.peer.of_socket: the socket's cgroup,
or the run's network namespace relay), never by what a request says.
Every call is an `llm` event of its run; what the gateway found wrong is
the event's finding, which the run's judge makes a violation
(resources.llm_tokens / llm_requests / llm_cost, identity.prompt) with the
policy's action (kill stops the run).
"""
import os
import threading

from ..core import peer
from ..run.services import RunService
from .budget import Budget, Ledger
from .gateway import Gateway
from .scheduler import DEFAULT_WEIGHT, Scheduler

ENV_KEYS = ("OPENAI_BASE_URL", "OPENAI_API_KEY", "ANTHROPIC_BASE_URL", "ANTHROPIC_API_KEY")


class GatewayService(RunService):
    name = "llm-gateway"

    def __init__(self, config, scheduler=None):
        self.config = config
        lim = config.limits
        self.scheduler = scheduler or Scheduler(max_concurrent=lim.max_concurrent,
                                                per_agent=lim.per_run, age_s=lim.age_s)
        self._lock = threading.Lock()
        self._runs = {}              # run id -> ServiceRun
        self._ledgers = {}           # run id -> Ledger
        self._prices = {m: (r.price_in or 0.0, r.price_out or 0.0) for m, r in config.routes.items()
                        if r.price_in is not None or r.price_out is not None}
        self.gateway = Gateway(config, self._caller, self._on_call, scheduler=self.scheduler,
                               ledger_for=self._ledgers.get).start()

    # -- RunService ---------------------------------------------------------------------
    def loopback_ports(self):
        return [self.gateway.port]

    def open_run(self, run):
        o = run.options
        budget = Budget(tokens=o.budget_tokens, requests=o.budget_requests, cost=o.budget_cost)
        with self._lock:
            self._runs[run.run_id] = run
            self._ledgers[run.run_id] = Ledger(budget, self._prices)
        action = run.action_for("identity", "identity.prompt") if run.action_for else "alert"
        self.gateway.register_run(run.run_id, run.agent, weight=o.weight or DEFAULT_WEIGHT,
                                  budget=budget, prompt=run.prompt,
                                  prompt_action="deny" if action == "kill" else action)
        key = f"agentwatch-run-{run.run_id}"      # names nothing: the kernel names the caller
        env = {"OPENAI_BASE_URL": f"{self.gateway.url}/v1", "OPENAI_API_KEY": key,
               "ANTHROPIC_BASE_URL": self.gateway.url, "ANTHROPIC_API_KEY": key}
        # a real key in the caller's environment (api_key_env read it from
        # there, or it is simply exported) must not reach the agent
        secrets = [k for k in self.config.keys() if k]
        for name, value in (os.environ if o.env is None else o.env).items():
            if name not in env and any(s in value for s in secrets):
                env[name] = None
        return env

    def close_run(self, run_id):
        self.gateway.unregister_run(run_id)
        with self._lock:
            self._runs.pop(run_id, None)
            ledger = self._ledgers.pop(run_id, None)
        return ledger.stats() if ledger is not None else None

    def close(self):
        self.gateway.close()

    # -- live figures (ps) --------------------------------------------------------------
    def run_stats(self, run_id):
        """The run's queue depth and waits, as the scheduler has them now."""
        a = self.scheduler.stats().agents.get(run_id)
        if a is None:
            return {}
        return {"queue_depth": a.queued, "in_flight": a.in_flight, "queue_wait_ms": round(a.wait_last_s * 1000, 1),
                "queue_wait_max_ms": round(a.wait_max_s * 1000, 1), "weight": a.weight,
                "tokens_in": a.tokens_in, "tokens_out": a.tokens_out}

    # -- the gateway's callbacks (its thread) -------------------------------------------
    @staticmethod
    def _caller(sock):
        return peer.of_socket(sock)

    def _on_call(self, run_id, record):
        run = self._runs.get(run_id) if run_id else None
        if run is None:
            return                   # a caller in no run: refused, counted by the gateway
        run.emit(llm_record(record))


def llm_record(rec):
    """A gateway call record -> the fields of the run's `llm` event."""
    out = {"kind": "llm", "ts": rec.get("ts"), "api": rec.get("api"), "path": rec.get("path"),
           "model": rec.get("model"), "upstream": rec.get("upstream"),
           "upstream_model": rec.get("upstream_model"), "stream": bool(rec.get("stream")),
           "status": rec.get("status"), "tokens_in": rec.get("tokens_in") or 0,
           "tokens_out": rec.get("tokens_out") or 0, "tokens_counted": bool(rec.get("tokens_counted")),
           "queue_wait": rec.get("queue_wait_s"), "latency": rec.get("latency_s"),
           "bytes_in": rec.get("bytes_in") or 0, "bytes_out": rec.get("bytes_out") or 0,
           "error": rec.get("error")}
    bodies = {k: rec[k] for k in ("request_body", "request_body_truncated", "response_body",
                                  "response_body_truncated") if k in rec}
    if bodies:                       # the config's keep_bodies: off by default, capped
        out["bodies"] = bodies
    # one finding per event: the one that refused the call, if any
    findings = sorted(rec.get("findings") or (), key=lambda f: f.get("category") != "resource"
                      and f.get("action") != "deny")
    if findings:
        f = findings[0]
        detail = dict(f.get("detail") or {})
        if f.get("category") == "resource":
            rule = f"resources.llm_{detail.pop('budget', None) or 'tokens'}"
        else:
            rule = "identity.prompt"
        # refused by the gateway: a budget always, a prompt under deny
        refused = f.get("category") == "resource" or f.get("action") == "deny"
        out["finding"] = {"category": f.get("category"), "rule": rule,
                          "reason": detail.pop("reason", None) or rec.get("error"),
                          "refused": refused, **detail}
    return {k: v for k, v in out.items() if v is not None}
