from step_ssh.cli import main

main()
