# Reference for mrrp_pacs/model/evaluate.py: Harrell's C, log-rank, hazard ratio and the
# Breslow baseline hazard from R survival.
#
# Usage: Rscript survival_metrics.R data.csv scalars.csv basehaz.csv
#   data.csv:    columns time, status (1 = event), risk (log hazard, higher = worse),
#                group (0 = low, 1 = high)
#   scalars.csv: columns name, value
#   basehaz.csv: columns time, hazard: H0(t) at risk 0 (centered = FALSE), with the risk as
#                the linear predictor (coefficient fixed at 1), Breslow estimator
suppressMessages(library(survival))
args <- commandArgs(trailingOnly = TRUE)
stopifnot(length(args) == 3)
d <- read.csv(args[1])

# reverse = TRUE: a higher predictor means a shorter time (risk, not predicted survival)
harrell <- concordance(Surv(time, status) ~ risk, data = d, reverse = TRUE)$concordance

test <- survdiff(Surv(time, status) ~ group, data = d)
logrank_p <- pchisq(test$chisq, df = length(test$n) - 1, lower.tail = FALSE)

cox <- coxph(Surv(time, status) ~ group, data = d)  # Efron ties, R's default
hr <- exp(unname(coef(cox)))
hr_ci <- exp(unname(confint(cox, level = 0.95)[1, ]))

fixed <- coxph(Surv(time, status) ~ risk, data = d, ties = "breslow", init = 1,
               control = coxph.control(iter.max = 0))
base <- basehaz(fixed, centered = FALSE)

scalars <- data.frame(
  name = c("harrell_c", "logrank_p", "logrank_chisq", "hazard_ratio", "hr_low", "hr_high"),
  value = sprintf("%.17g", c(harrell, logrank_p, test$chisq, hr, hr_ci)))
write.csv(scalars, args[2], row.names = FALSE, quote = FALSE)
write.csv(data.frame(time = sprintf("%.17g", base$time), hazard = sprintf("%.17g", base$hazard)),
          args[3], row.names = FALSE, quote = FALSE)
