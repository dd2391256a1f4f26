# Which R and which survival package made the committed reference values (tests/reference/*.json).
suppressMessages(library(survival))
cat(R.version.string, "; survival ", format(packageVersion("survival")), "\n", sep = "")
