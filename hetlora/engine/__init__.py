"""The round engine: one federated round without a transport, called by the HTTP server (server_stub) and the
Flower apps (hetlora_flower). Transports move bytes and map errors; everything else is here.

config        ServerConfig: the run (rule, ranks, stages, training settings, defence, server optimiser)
run_options   the run's command-line options and build_config (serve's flags, a Flower run config's keys)
planning      select the round's clients, configure each one's ClientPlan, the download view
uploads       receive (an upload's header bounded, decoded once) and take (checked against its plan -> Update)
combine       a round's new global with its metadata: round 0's head, or bounded influence, the rule, the server
              optimiser; the first global without round 0
history       a closed round's history entry (both transports' histories)
errors        DomainError and its kinds (Invalid, Unauthenticated, NotSelected, NotFound, Conflict, CannotTrain)
registration  a joining client's fields, checked once (HTTP registration, Flower introduction)
tiers         a client's Tier from its profile (the tier policy), the request and the rank set
selection     seeded selection, the key that seeds and orders a client
upload_checks check_update: one LoRA or head update against its plan; update_digest
head_round    round 0's statistics checks and the initial global with the closed-form head
init_adapter  `--init-adapter`: a PEFT or wire adapter as global version 0; run_rule, the run's rule
aggregation/  the pure numpy rules (fedavg, hetlora, hlora, plora), bounds, robust, server_opt, the pipeline
"""
