"""The seed paper's experiment as a product feature (`kdcache replicate`).

An application on top of the five components: it builds teachers (teacher_dump), dumps
(teacher_dump -> formats), students (student_train) and evaluates them (evaluate), and nothing
imports it.
"""
