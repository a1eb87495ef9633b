// Apply a drizzle-kit migrations folder with drizzle-orm's own migrator (node-postgres driver).
// Used to prove that `backup-pipelines rollback` works on databases migrated by real drizzle:
//
//   npm install drizzle-orm pg
//   DATABASE_URL=postgresql://user:pass@127.0.0.1:5432/app node migrate.mjs ./migrations
//
// MIGRATIONS_SCHEMA / MIGRATIONS_TABLE override drizzle's defaults (drizzle / __drizzle_migrations).
import pg from "pg";
import { drizzle } from "drizzle-orm/node-postgres";
import { migrate } from "drizzle-orm/node-postgres/migrator";

const folder = process.argv[2] ?? "./migrations";
const client = new pg.Client({ connectionString: process.env.DATABASE_URL });
await client.connect();
try {
  const config = { migrationsFolder: folder };
  if (process.env.MIGRATIONS_SCHEMA) config.migrationsSchema = process.env.MIGRATIONS_SCHEMA;
  if (process.env.MIGRATIONS_TABLE) config.migrationsTable = process.env.MIGRATIONS_TABLE;
  await migrate(drizzle(client), config);
  console.log(`applied pending migrations from ${folder}`);
} finally {
  await client.end();
}
