# Reference for mrrp_pacs/model/losses.py: the Cox log partial likelihood at GIVEN coefficients
# (no fitting: init = beta, iter.max = 0), Efron and Breslow ties, with case weights.
#
# Usage: Rscript cox_loglik.R data.csv beta.csv out.csv
#   data.csv: columns time, status (1 = event), weight, then the covariates
#   beta.csv: one column "beta", one row per covariate, in the order of data.csv
#   out.csv:  columns ties, loglik
suppressMessages(library(survival))
args <- commandArgs(trailingOnly = TRUE)
stopifnot(length(args) == 3)
d <- read.csv(args[1])
beta <- read.csv(args[2])$beta
covariates <- setdiff(names(d), c("time", "status", "weight"))
stopifnot(length(beta) == length(covariates))
formula <- as.formula(paste("Surv(time, status) ~", paste(covariates, collapse = " + ")))
ties <- c("efron", "breslow")
loglik <- sapply(ties, function(method) {
  fit <- coxph(formula, data = d, weights = weight, ties = method, init = beta,
               control = coxph.control(iter.max = 0))
  stopifnot(isTRUE(all.equal(unname(coef(fit)), beta)))
  fit$loglik[1]
})
write.csv(data.frame(ties = ties, loglik = sprintf("%.17g", loglik)), args[3],
          row.names = FALSE, quote = FALSE)
