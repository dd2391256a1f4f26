# Reference for mrrp_pacs/model/evaluate.py: cumulative/dynamic time-dependent AUC, IPCW Brier
# scores and integrated Brier scores from R riskRegression::Score and pec::pec, with the
# Kaplan-Meier censoring model (weights 1/G(T_i-) for events by t, 1/G(t) for those event-free
# after t).
#
# Usage: Rscript ipcw_scores.R data.csv times.csv score.csv grid.csv scalars.csv
#   data.csv:    columns time, status (1 = event), risk (log hazard, higher = worse)
#   times.csv:   columns kind ("horizon" or "grid"), time: the horizons of the AUC and Brier
#                scores, and the (uniform) grid of the integrated Brier score
#   score.csv:   columns time, auc, brier at the horizons (Score)
#   grid.csv:    columns time, brier_score, brier_pec: the Brier score at each grid time from
#                Score and from pec
#   scalars.csv: columns name, value: ibs_trapezoid (trapezoid rule over Score's Brier scores
#                on the grid, divided by its span), ibs_pec (pec::ibs from the first to the
#                last grid time: left-point rule), ibs_score (Score's summary "ibs" at the last
#                grid time: left-point rule from 0, with a Brier score of 0 at 0)
#
# The predicted survival is the Cox model's with the risk as its linear predictor (coefficient
# fixed at 1) and the Breslow baseline hazard fitted on the same data: S_i(t) = exp(-H0(t)
# exp(risk_i)). Score takes predicted risks, 1 - S; pec takes S.
suppressMessages({
  library(survival)
  library(riskRegression)
  library(pec)
})
args <- commandArgs(trailingOnly = TRUE)
stopifnot(length(args) == 5)
d <- read.csv(args[1])
times <- read.csv(args[2])
horizons <- times$time[times$kind == "horizon"]
grid <- times$time[times$kind == "grid"]

fixed <- coxph(Surv(time, status) ~ risk, data = d, ties = "breslow", init = 1,
               control = coxph.control(iter.max = 0))
base <- basehaz(fixed, centered = FALSE)
H0 <- stepfun(base$time, c(0, base$hazard))
survival_at <- function(t) exp(-outer(exp(d$risk), H0(t)))

at_horizons <- Score(list(model = 1 - survival_at(horizons)), formula = Surv(time, status) ~ 1,
                     data = d, times = horizons, metrics = c("auc", "brier"),
                     cens.model = "km", se.fit = FALSE, null.model = FALSE)
on_grid <- Score(list(model = 1 - survival_at(grid)), formula = Surv(time, status) ~ 1,
                 data = d, times = grid, metrics = "brier", summary = "ibs",
                 cens.model = "km", se.fit = FALSE, null.model = FALSE)
brier <- on_grid$Brier$score$Brier
curve <- pec(list(model = survival_at(grid)), formula = Surv(time, status) ~ 1, data = d,
             times = grid, exact = FALSE, start = grid[1], cens.model = "marginal",
             reference = FALSE, verbose = FALSE)
stopifnot(isTRUE(all.equal(curve$time, grid)))

f <- function(x) sprintf("%.17g", x)
write.csv(data.frame(time = f(horizons), auc = f(at_horizons$AUC$score$AUC),
                     brier = f(at_horizons$Brier$score$Brier)),
          args[3], row.names = FALSE, quote = FALSE)
write.csv(data.frame(time = f(grid), brier_score = f(brier), brier_pec = f(curve$AppErr$model)),
          args[4], row.names = FALSE, quote = FALSE)
span <- grid[length(grid)] - grid[1]
scalars <- data.frame(
  name = c("ibs_trapezoid", "ibs_pec", "ibs_score"),
  value = f(c(sum(diff(grid) * (brier[-1] + brier[-length(brier)]) / 2) / span,
              as.numeric(ibs(curve, times = grid[length(grid)], start = grid[1])),
              on_grid$Brier$score$IBS[length(grid)])))
write.csv(scalars, args[5], row.names = FALSE, quote = FALSE)
