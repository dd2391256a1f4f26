# Which R and which packages made the committed reference values (tests/reference/*.json).
# Usage: Rscript versions.R [PACKAGE ...]   (default: survival)
packages <- commandArgs(trailingOnly = TRUE)
if (length(packages) == 0) packages <- "survival"
for (package in packages) suppressMessages(library(package, character.only = TRUE))
cat(R.version.string, sep = "")
for (package in packages) cat("; ", package, " ", format(packageVersion(package)), sep = "")
cat("\n")
